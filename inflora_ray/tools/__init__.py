"""Tools that are not part of a run: pre-training the quickstart backbone on rendered glyphs."""
