"""Cameras and rendering."""
