"""The pure-PyTorch reference backend: the numerical oracle for every other backend's op tests."""
