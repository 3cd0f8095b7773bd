"""Batch scoring (``batchgate score``): files scored through the models and backends batchgate serves."""
