"""Lucity build runner: clones, plans and builds one image inside its Job's pod."""
