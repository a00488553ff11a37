//! The supervisor (`serve`): catalogue, worker processes, proxy, eviction, monitor, auth, admin API.
pub mod hub;
