//! Resource usage as seen from inside the sandbox (its /proc).

use std::time::Instant;

use tartarus_proto::Stats;

fn meminfo_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// CPU seconds (user + system) of one /proc/PID/stat line.
fn cpu_ticks(stat: &str) -> Option<u64> {
    // The command name may contain spaces and parentheses; fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

pub fn collect(started: Instant) -> Stats {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let total = meminfo_kib(&meminfo, "MemTotal").unwrap_or(0) * 1024;
    let available = meminfo_kib(&meminfo, "MemAvailable").unwrap_or(0) * 1024;
    let ticks_per_s = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|t| *t > 0)
        .unwrap_or(100) as f64;
    let mut pids = 0u32;
    let mut ticks = 0u64;
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let name = entry.file_name();
            if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            pids += 1;
            if let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) {
                ticks += cpu_ticks(&stat).unwrap_or(0);
            }
        }
    }
    Stats {
        cpu_seconds: ticks as f64 / ticks_per_s,
        memory_bytes: total.saturating_sub(available),
        memory_total_bytes: total,
        pids,
        uptime_s: started.elapsed().as_secs_f64(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_formats() {
        let stat = "42 (a (weird) name) S 1 42 42 0 -1 4194304 100 0 0 0 7 5 0 0 20 0 1 0";
        assert_eq!(cpu_ticks(stat), Some(12));
        let meminfo = "MemTotal:       24000000 kB\nMemFree: 1 kB\nMemAvailable:   12000000 kB\n";
        assert_eq!(meminfo_kib(meminfo, "MemTotal"), Some(24_000_000));
        assert_eq!(meminfo_kib(meminfo, "MemAvailable"), Some(12_000_000));
        let now = collect(Instant::now());
        assert!(now.pids >= 1);
    }
}
