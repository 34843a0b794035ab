"""The `graphprune` command line: `cli.main.main` parses the arguments and maps errors to exit codes."""
