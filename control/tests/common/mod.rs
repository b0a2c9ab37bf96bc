//! Test harness shared by the control-plane tests (and, by path, the end-to-end
//! tests): throwaway PostgreSQL and Redis servers from the installed binaries.
pub mod http;
pub mod pg;
pub mod prom;
pub mod redis;
