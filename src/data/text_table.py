"""Work in progress: lands in the next commit."""
