//! Resolves the `user` of an exec from the sandbox's own /etc/passwd and /etc/group.
//! The agent is a static binary, so there is no NSS: these files are the whole story.

use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub name: Option<String>,
    pub home: Option<String>,
}

#[derive(Debug)]
struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 7 {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_owned(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_owned(),
            })
        })
        .collect()
}

/// (name, gid, members) of each group.
fn parse_group(text: &str) -> Vec<(String, u32, Vec<String>)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 4 {
                return None;
            }
            let members = f[3]
                .split(',')
                .filter(|m| !m.is_empty())
                .map(str::to_owned)
                .collect();
            Some((f[0].to_owned(), f[2].parse().ok()?, members))
        })
        .collect()
}

fn read_small(path: &Path) -> String {
    use std::io::Read;
    let mut text = String::new();
    if let Ok(file) = std::fs::File::open(path) {
        // /etc/passwd of a sane rootfs is tiny; the bound keeps a hostile one harmless.
        let _ = file.take(4 << 20).read_to_string(&mut text);
    }
    text
}

/// Resolves `user[:group]`, each a name or a number, against `etc` (normally `/etc`).
pub fn resolve(spec: &str, etc: &Path) -> Result<Credentials, String> {
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user_part.is_empty() || group_part == Some("") {
        return Err(format!(
            "invalid user {spec:?}: expected NAME, UID or UID:GID"
        ));
    }
    let passwd = parse_passwd(&read_small(&etc.join("passwd")));
    let groups = parse_group(&read_small(&etc.join("group")));
    let entry =
        match user_part.parse::<u32>() {
            Ok(uid) => passwd.iter().find(|e| e.uid == uid),
            Err(_) => Some(passwd.iter().find(|e| e.name == user_part).ok_or_else(|| {
                format!("no user {user_part:?} in {}", etc.join("passwd").display())
            })?),
        };
    let uid = match entry {
        Some(e) => e.uid,
        None => user_part.parse::<u32>().map_err(|e| e.to_string())?,
    };
    let gid = match group_part {
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => groups
                .iter()
                .find(|(name, _, _)| name == g)
                .map(|(_, gid, _)| *gid)
                .ok_or_else(|| format!("no group {g:?} in {}", etc.join("group").display()))?,
        },
        None => entry.map_or(uid, |e| e.gid),
    };
    let mut supplementary = vec![gid];
    if let Some(e) = entry {
        for (_, g, members) in &groups {
            if members.contains(&e.name) && !supplementary.contains(g) {
                supplementary.push(*g);
            }
        }
    }
    Ok(Credentials {
        uid,
        gid,
        groups: supplementary,
        name: entry.map(|e| e.name.clone()),
        home: entry.map(|e| e.home.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn etc() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("passwd"),
            "root:x:0:0:root:/root:/bin/sh\n# comment\nalice:x:1000:1000::/home/alice:/bin/sh\nbroken line\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("group"),
            "root:x:0:\nalice:x:1000:\nwheel:x:10:alice,bob\n",
        )
        .unwrap();
        dir
    }

    #[test]
    fn names_and_numbers_resolve() {
        let dir = etc();
        let alice = resolve("alice", dir.path()).unwrap();
        assert_eq!((alice.uid, alice.gid), (1000, 1000));
        assert_eq!(alice.groups, vec![1000, 10]);
        assert_eq!(alice.home.as_deref(), Some("/home/alice"));
        let numeric = resolve("4242:4343", dir.path()).unwrap();
        assert_eq!((numeric.uid, numeric.gid, numeric.home), (4242, 4343, None));
        assert_eq!(
            resolve("1000", dir.path()).unwrap().name.as_deref(),
            Some("alice")
        );
        assert_eq!(resolve("alice:wheel", dir.path()).unwrap().gid, 10);
    }

    #[test]
    fn unknown_names_are_errors() {
        let dir = etc();
        assert!(resolve("mallory", dir.path())
            .unwrap_err()
            .contains("no user"));
        assert!(resolve("alice:nogroup", dir.path())
            .unwrap_err()
            .contains("no group"));
        assert!(resolve("", dir.path()).is_err());
        assert!(resolve("1:", dir.path()).is_err());
    }
}
