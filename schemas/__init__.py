"""Record contracts and pure normalization (CONTRACT §2). No I/O."""
