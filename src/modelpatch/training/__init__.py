"""Training: the LightningModule that joins models and data, its optimizer and metrics, DDP settings,
checkpoints (resume, ``init_from``, backbone weights from files), cached features, compiling and the console."""
