"""Bridges that put fp4's kernels under other libraries' APIs (see fp4.integrations.bitsandbytes)."""
