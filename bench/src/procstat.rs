//! `/proc` sampling: resident memory and CPU time of the server processes (and of the
//! generator itself), plus the open-file limit check.

use anyhow::{Context, anyhow};

/// Linux reports `/proc/<pid>/stat` CPU times in USER_HZ ticks, which is 100 on every
/// mainstream architecture (it is part of the ABI, independent of the kernel's HZ).
const TICKS_PER_SEC: f64 = 100.0;

/// One sample of a process (or the sum over several).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcSample {
    /// Resident set size, KiB (`VmRSS`).
    pub rss_kb: u64,
    /// User plus system CPU time, seconds.
    pub cpu_s: f64,
}

impl std::ops::Add for ProcSample {
    type Output = Self;
    fn add(self, o: Self) -> Self {
        Self {
            rss_kb: self.rss_kb + o.rss_kb,
            cpu_s: self.cpu_s + o.cpu_s,
        }
    }
}

/// Samples one process; `pid` is a number or `self`.
pub fn sample(pid: &str) -> anyhow::Result<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status (is the process running?)"))?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    Ok(ProcSample {
        rss_kb: parse_vm_rss(&status).ok_or_else(|| anyhow!("no VmRSS for pid {pid}"))?,
        cpu_s: parse_cpu_ticks(&stat).ok_or_else(|| anyhow!("bad /proc/{pid}/stat"))? as f64
            / TICKS_PER_SEC,
    })
}

/// Sums samples over several processes; `None` when there are none.
pub fn sample_all(pids: &[u32]) -> anyhow::Result<Option<ProcSample>> {
    if pids.is_empty() {
        return Ok(None);
    }
    let mut total = ProcSample::default();
    for pid in pids {
        total = total + sample(&pid.to_string())?;
    }
    Ok(Some(total))
}

/// `VmRSS:   1234 kB` from `/proc/<pid>/status`.
fn parse_vm_rss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// `utime + stime` (fields 14 and 15) from `/proc/<pid>/stat`. The command name (field 2)
/// may contain spaces and parentheses, so fields are counted after its last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The soft `Max open files` limit of this process, from `/proc/self/limits`.
pub fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_and_status() {
        let stat =
            "4242 (my (weird) proc) S 1 4242 4242 0 -1 4194560 300 0 0 0 157 43 0 0 20 0 3 0 1 2 3";
        assert_eq!(parse_cpu_ticks(stat), Some(200));
        assert_eq!(parse_vm_rss("Name:\tx\nVmRSS:\t   10240 kB\n"), Some(10240));
    }

    #[test]
    fn samples_self() {
        let s = sample("self").unwrap();
        assert!(s.rss_kb > 0);
        assert!(open_file_limit().unwrap() > 0);
    }
}
