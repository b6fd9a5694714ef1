"""The RA network (encoder, decoder) and its configuration."""
