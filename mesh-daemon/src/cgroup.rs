//! cgroup v2: where it is mounted, and which pod a kubelet cgroup directory belongs to.
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "no cgroup2 filesystem is mounted (checked /proc/self/mountinfo); Sidelane needs cgroup v2 \
         (unified or hybrid hierarchy)"
    )]
    NoCgroup2,
}

/// Finds the cgroup2 mount point: `/sys/fs/cgroup` on a unified host, often
/// `/sys/fs/cgroup/unified` on a hybrid one. Never assume either.
pub fn find_v2_mount() -> Result<PathBuf, CgroupError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.into(),
        source,
    })?;
    parse_v2_mount(&text).ok_or(CgroupError::NoCgroup2)
}

fn parse_v2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "36 35 0:30 / /sys/fs/cgroup/unified rw,... shared:9 - cgroup2 cgroup2 rw"
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        if fstype == "cgroup2" {
            left.split_whitespace().nth(4).map(PathBuf::from)
        } else {
            None
        }
    })
}

/// Extracts the pod UID from a kubelet cgroup path, for both cgroup drivers:
/// cgroupfs `/kubepods/burstable/pod1b4e...-.../<container>` and systemd
/// `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b4e..._..._.slice/cri-...`.
pub fn pod_uid(path: &str) -> Option<String> {
    path.split('/').find_map(|seg| {
        let seg = seg.strip_suffix(".slice").unwrap_or(seg);
        let idx = seg.rfind("pod")?;
        let uid = &seg[idx + 3..];
        let uid = uid.replace('_', "-");
        looks_like_uid(&uid).then_some(uid)
    })
}

fn looks_like_uid(s: &str) -> bool {
    s.len() == 36
        && s.chars().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_and_unified_mounts() {
        let hybrid = "25 1 0:22 / /sys/fs/cgroup ro - tmpfs tmpfs ro\n\
                      26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid shared:5 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_v2_mount(hybrid),
            Some("/sys/fs/cgroup/unified".into())
        );
        let unified = "30 1 0:26 / /sys/fs/cgroup rw shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(parse_v2_mount(unified), Some("/sys/fs/cgroup".into()));
        assert_eq!(parse_v2_mount("1 0 0:1 / / rw - ext4 /dev/sda rw\n"), None);
    }

    #[test]
    fn pod_uid_from_both_drivers() {
        let uid = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
        assert_eq!(
            pod_uid(&format!("/kubepods/burstable/pod{uid}/abc123")).as_deref(),
            Some(uid)
        );
        assert_eq!(
            pod_uid(
                "/kubepods.slice/kubepods-besteffort.slice/\
                 kubepods-besteffort-pod1b4e28ba_2fa1_11d2_883f_0016d3cca427.slice/cri-containerd-1.scope"
            )
            .as_deref(),
            Some(uid)
        );
        assert_eq!(pod_uid("/system.slice/sshd.service"), None);
        assert_eq!(pod_uid("/kubepods/podnotauid/x"), None);
    }
}
