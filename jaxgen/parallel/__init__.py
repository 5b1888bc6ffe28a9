"""Device mesh, logical-axis sharding rules, multi-process initialisation and global-batch assembly."""
