"""Triton kernels of fbn_fast, installed as ``fbn_fast.kernels``."""
