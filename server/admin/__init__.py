"""batchgate's admin API (proto/batchgate/admin/v1/admin.proto) and its servers."""
