"""Task runners, their data and the tools that compare their runs."""
