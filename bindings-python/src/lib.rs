//! Python binding for anyvm (see issue: Python binding). Not built out yet.
