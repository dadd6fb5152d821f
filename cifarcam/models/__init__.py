"""The networks cifarcam trains."""
