"""End-to-end tests: whole experiments, the CLI and launchers in processes, benchmarks, recipes."""
