//! Resident memory and CPU time of processes, from `/proc`.
//!
//! RSS is `VmRSS` of `/proc/PID/status` (KiB). CPU time is `utime + stime` of `/proc/PID/stat`
//! (fields 14 and 15, in clock ticks of `sysconf(_SC_CLK_TCK)`, usually 100 per second): time
//! on any core, so a process using both cores for a second counts 2 s.

use serde::{Deserialize, Serialize};

/// Clock ticks per second of `/proc/PID/stat` times.
pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// `utime + stime` (ticks) from the text of `/proc/PID/stat`. The command name (field 2) is in
/// parentheses and may hold spaces or parentheses itself, so fields are counted after the last
/// `)`.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// `VmRSS` (KiB) from the text of `/proc/PID/status`.
pub fn parse_status_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line["VmRSS:".len()..].split_whitespace().next()?.parse().ok()
}

/// One reading of a process; `None` fields when it could not be read (the process is gone).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Sample {
    pub rss_kib: Option<u64>,
    pub cpu_ticks: Option<u64>,
}

pub fn sample(pid: u32) -> Sample {
    Sample {
        rss_kib: std::fs::read_to_string(format!("/proc/{pid}/status")).ok().and_then(|s| parse_status_rss_kib(&s)),
        cpu_ticks: std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| parse_stat_ticks(&s)),
    }
}

/// How many file descriptors the process has open (entries of `/proc/PID/fd`).
pub fn open_fds(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// CPU ticks this process has used so far.
pub fn self_ticks() -> u64 {
    std::fs::read_to_string("/proc/self/stat").ok().and_then(|s| parse_stat_ticks(&s)).unwrap_or(0)
}

/// Ticks as seconds.
pub fn ticks_to_secs(ticks: u64) -> f64 {
    ticks as f64 / clock_ticks() as f64
}

/// Raises the soft limit of open files to the hard limit (one fd per connection).
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_the_command_name() {
        let stat = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 1234 0 0 0 350 125 0 0 20 0 \
                    9 0 777 123456789 3000 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0";
        assert_eq!(parse_stat_ticks(stat), Some(475));
        assert_eq!(parse_stat_ticks("1 (x) S 1 2"), None);
    }

    #[test]
    fn status_rss() {
        let status = "Name:\tswitchyard\nVmPeak:\t  100 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(parse_status_rss_kib(status), Some(12345));
        assert_eq!(parse_status_rss_kib("Name:\tx\n"), None);
    }

    #[test]
    fn reads_this_process() {
        let s = sample(std::process::id());
        assert!(s.rss_kib.unwrap() > 0);
        assert!(s.cpu_ticks.is_some());
        assert!(clock_ticks() > 0);
    }
}
