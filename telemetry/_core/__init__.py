"""What every integration runs on: settings, the metric catalogue, accumulators, snapshots,
the per-process files and their exposition, structured events, owners, bounds, the one hold
accounting for every connection pool, the runtime. Imports nothing above it."""
