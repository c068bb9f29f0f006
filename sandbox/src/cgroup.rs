//! A child cgroup v2 for the processes whose sockets the datapath serves.

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::Duration,
};

/// A cgroup created under a parent (never the parent itself), killed and removed on drop.
#[derive(Debug)]
pub struct ChildCgroup {
    path: PathBuf,
}

impl ChildCgroup {
    pub fn create(parent: &Path, name: &str) -> io::Result<Self> {
        let path = parent.join(name);
        fs::create_dir(&path)?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Moves the calling process into the cgroup at `path`.
pub fn join(path: &Path) -> io::Result<()> {
    fs::write(path.join("cgroup.procs"), "0")
}

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        // cgroup.kill (Linux 5.14) ends every process left in it, so rmdir can succeed.
        let _ = fs::write(self.path.join("cgroup.kill"), "1");
        for _ in 0..50 {
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        tracing::warn!("could not remove cgroup {}", self.path.display());
    }
}
