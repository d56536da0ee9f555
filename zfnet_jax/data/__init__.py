"""The data: sources (``sources``), the paper's preprocessing (``preprocessing``), and
batches for training and evaluation (``iterators``)."""
