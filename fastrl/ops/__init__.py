"""Autograd Functions, functional APIs and the plain-PyTorch reference of every op."""
