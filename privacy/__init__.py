"""DP-SGD set-up and accounting, the per-client ledger, secure-aggregation pieces, update guards."""
