"""What a run measured: metrics, the evaluation report, per-stage results for monitoring, judge agreement
and the transfer sweep's table."""
