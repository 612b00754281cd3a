//! Process hardening at start: no core dumps (a core of this process would hold tenant keys
//! and plaintext), and not ptrace-attachable by same-uid processes that lack
//! CAP_SYS_PTRACE (the "dumpable" flag also governs that).

use crate::error::DaemonError;

/// Sets RLIMIT_CORE to 0 (soft and hard) and clears the dumpable flag.
pub fn disable_core_dumps() -> Result<(), DaemonError> {
    use rustix::process::{DumpableBehavior, Resource, Rlimit, set_dumpable_behavior, setrlimit};
    setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )
    .map_err(|e| DaemonError::Hardening(format!("setrlimit(RLIMIT_CORE, 0): {e}")))?;
    set_dumpable_behavior(DumpableBehavior::NotDumpable)
        .map_err(|e| DaemonError::Hardening(format!("prctl(PR_SET_DUMPABLE, 0): {e}")))?;
    Ok(())
}
