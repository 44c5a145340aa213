"""The Gradio Blocks UI: one module per tab, handlers as plain functions that only touch SQLite."""
