"""Lightning-free pipelines every rank runs with the same arguments: explain, mislabel, diagnostics,
leave-one-out and the correction algorithm. They talk to other ranks only through a ``Collectives``."""
