"""The medusa-export command line."""
