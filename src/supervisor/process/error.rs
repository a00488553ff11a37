//! Why a model could not be made ready: the process manager's one error type.

/// Why a model could not be made ready. Each maps to an HTTP status in `proxy`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    #[error("model `{0}` not found")]
    NotFound(String),
    #[error("model `{0}` is disabled")]
    Disabled(String),
    #[error("model `{model}` cannot run on this engine: {reason}")]
    Unsupported { model: String, reason: String },
    #[error(
        "cannot load `{model}`: it needs about {need_mib} MiB, {used_mib} MiB of {total_mib} MiB are in use and the limit is MAX_MEMORY_PERCENT={percent}% ({limit_mib} MiB); no idle model is left to unload"
    )]
    InsufficientMemory {
        model: String,
        need_mib: u64,
        used_mib: u64,
        total_mib: u64,
        limit_mib: u64,
        percent: u8,
    },
    #[error(
        "cannot load `{model}`: its layers on the GPU need about {need_mib} MiB of GPU memory and {gpu} has {free_mib} MiB free of {total_mib} MiB, with no idle model on it left to unload; a smaller gpu_layers (per model, or GPU_LAYERS) keeps more layers on the CPU"
    )]
    InsufficientDeviceMemory {
        model: String,
        /// The GPU's name as NVML reports it.
        gpu: String,
        need_mib: u64,
        free_mib: u64,
        total_mib: u64,
    },
    #[error(
        "cannot load `{model}`: {loaded} model(s) loaded (MAX_LOADED_MODELS={max}) and none became idle within {waited_s} s"
    )]
    TooManyLoaded {
        model: String,
        loaded: usize,
        max: u32,
        waited_s: u64,
    },
    #[error("model `{model}` failed to load: {reason}")]
    Failed { model: String, reason: String },
    #[error("model `{model}` failed recently ({reason}); retrying in {retry_s} s")]
    Backoff {
        model: String,
        reason: String,
        retry_s: u64,
    },
    #[error(
        "model `{model}` is being unloaded and did not stop within {waited_s} s; retry in {retry_s} s"
    )]
    Draining {
        model: String,
        waited_s: u64,
        retry_s: u64,
    },
    #[error("the supervisor is shutting down")]
    ShuttingDown,
    #[error("database: {0}")]
    Db(String),
    /// The database is locked by another process, so the worker cannot be recorded (and reaped
    /// after a crash of the supervisor): the load is refused until the lock is gone.
    #[error("model `{model}` cannot be loaded now: {reason}")]
    DatabaseBusy { model: String, reason: String },
}
