"""twistd plugin implementations (Options and makeService for each)."""
