"""The command line: parsing, the commands, what they print."""
