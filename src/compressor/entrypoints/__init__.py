"""Ways in: the command line, and later oneshot and the Trainer callback."""
