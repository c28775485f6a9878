"""Studies: seeded, paired suites of training runs (`phd study`), their results file and the report built from it."""
