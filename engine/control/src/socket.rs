//! Where msld's control socket is.
//!
//! In order: the path given (`mslctl --socket`); the `control_socket` key
//! of the node's config (`mslctl --config`; msld's default when the key is
//! absent); the default [`DEFAULT_SOCKET`] if it exists; else the only
//! socket in [`SOCKET_DIR`] (one `msld@NAME` instance per host, each with
//! its own socket, as the example configs have it); else the default (the
//! connect error then names it).

use std::path::{Path, PathBuf};

/// msld's default `control_socket`.
pub const DEFAULT_SOCKET: &str = "/run/msl/msld.sock";
/// Where the systemd unit keeps the sockets (`RuntimeDirectory=msl`).
pub const SOCKET_DIR: &str = "/run/msl";

/// The `control_socket` of a node's msld config (TOML). Only that key is
/// read; the rest of the file is msld's to check.
pub fn socket_from_config(config: &Path) -> Result<PathBuf, String> {
    let text =
        std::fs::read_to_string(config).map_err(|e| format!("config {}: {e}", config.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| format!("config {}: {e}", config.display()))?;
    match table.get("control_socket") {
        None => Ok(PathBuf::from(DEFAULT_SOCKET)),
        Some(toml::Value::String(s)) if !s.is_empty() => Ok(PathBuf::from(s)),
        Some(v) => Err(format!(
            "config {}: control_socket must be a path, not {v}",
            config.display()
        )),
    }
}

/// The socket to use (see the module documentation); `dir` is
/// [`SOCKET_DIR`] outside tests.
pub fn find_socket(
    socket: Option<&Path>,
    config: Option<&Path>,
    dir: &Path,
) -> Result<PathBuf, String> {
    if let Some(s) = socket {
        return Ok(s.to_path_buf());
    }
    if let Some(c) = config {
        return socket_from_config(c);
    }
    let default = dir.join(
        Path::new(DEFAULT_SOCKET)
            .file_name()
            .unwrap_or_else(|| unreachable!("a file name")),
    );
    if default.exists() {
        return Ok(default);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .collect();
    found.sort();
    match found.len() {
        0 => Ok(default),
        1 => Ok(found.remove(0)),
        _ => Err(format!(
            "{} msld sockets in {} ({}): say which node with --config /etc/msl/NAME.toml \
             or --socket PATH",
            found.len(),
            dir.display(),
            found
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_socket_from_config_reads_key_or_default() {
        let d = tempfile::tempdir().unwrap();
        let c = d.path().join("n.toml");
        std::fs::write(
            &c,
            "node_id = 1\ncontrol_socket = \"/run/msl/node1.sock\"\n[msl]\ninterface = \"x\"\n",
        )
        .unwrap();
        assert_eq!(
            socket_from_config(&c).unwrap(),
            PathBuf::from("/run/msl/node1.sock")
        );
        std::fs::write(&c, "node_id = 1\n").unwrap();
        assert_eq!(
            socket_from_config(&c).unwrap(),
            PathBuf::from(DEFAULT_SOCKET)
        );
        std::fs::write(&c, "control_socket = 5\n").unwrap();
        assert!(socket_from_config(&c)
            .unwrap_err()
            .contains("control_socket must be a path"));
        std::fs::write(&c, "node_id = \n").unwrap();
        assert!(socket_from_config(&c).unwrap_err().contains("n.toml"));
        let missing = d.path().join("missing.toml");
        assert!(socket_from_config(&missing)
            .unwrap_err()
            .contains("missing.toml"));
    }

    #[test]
    fn test_find_socket_order() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let explicit = Path::new("/x.sock");
        assert_eq!(
            find_socket(Some(explicit), None, dir).unwrap(),
            explicit.to_path_buf()
        );
        // Nothing there: the default (the connect error names it).
        assert_eq!(find_socket(None, None, dir).unwrap(), dir.join("msld.sock"));
        // The only socket of the directory.
        std::fs::write(dir.join("node1.sock"), "").unwrap();
        std::fs::write(dir.join("notes.txt"), "").unwrap();
        assert_eq!(
            find_socket(None, None, dir).unwrap(),
            dir.join("node1.sock")
        );
        // Two: ambiguous, both named.
        std::fs::write(dir.join("node2.sock"), "").unwrap();
        let e = find_socket(None, None, dir).unwrap_err();
        assert!(e.contains("node1.sock") && e.contains("node2.sock") && e.contains("--config"));
        // The default wins over the others.
        std::fs::write(dir.join("msld.sock"), "").unwrap();
        assert_eq!(find_socket(None, None, dir).unwrap(), dir.join("msld.sock"));
        // A config wins over the directory.
        let c = dir.join("n.toml");
        std::fs::write(&c, "control_socket = \"/run/msl/n.sock\"\n").unwrap();
        assert_eq!(
            find_socket(None, Some(&c), dir).unwrap(),
            PathBuf::from("/run/msl/n.sock")
        );
    }
}
