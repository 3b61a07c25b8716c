//! C ABI for anyvm (see issue: C ABI and C++ header). Not built out yet.
