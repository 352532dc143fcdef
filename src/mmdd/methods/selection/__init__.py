"""Selection of real pairs (nothing learned): coresets, PDS-style prototypes and the clustering they share."""
