//! The `raftwire demo` run.
