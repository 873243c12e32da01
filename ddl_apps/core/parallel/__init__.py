"""Model-parallel pieces that any trainer can use beside the data-parallel engines."""
