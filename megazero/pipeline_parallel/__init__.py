"""Pipeline parallelism: schedules (no-pipelining today; 1F1B and interleaved in their issue)."""
