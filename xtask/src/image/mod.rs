//! `cargo xtask image`: the node image, built `FROM scratch` with buildah from the
//! project's own files (a static musl `ward` of the dist profile with the eBPF object
//! embedded, and Debian's CA bundle), saved as an oci-archive under `target/image/`.
//!
//! The image's definition is the last stage of `deploy/Dockerfile`; its build stage runs
//! [`rootfs`] (`cargo xtask image rootfs DIR`), which is also the first step here. So
//! Docker elsewhere and buildah here build the same thing from one description.

mod check;

pub use check::check;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{build_ebpf, cargo, ensure_debs, root, run, Result};

/// The musl target: a static binary that needs nothing from the image.
pub const MUSL: &str = "x86_64-unknown-linux-musl";

/// Where the image keeps the binary and the CA bundle (Debian's path, where rustls'
/// native roots and OpenSSL look).
const WARD: &str = "usr/bin/ward";
const CA_BUNDLE: &str = "etc/ssl/certs/ca-certificates.crt";

/// The line of deploy/Dockerfile's image stage that takes the build stage's rootfs, and
/// what it becomes when xtask made the rootfs itself.
const ROOTFS_FROM_BUILD: &str = "COPY --from=build /rootfs/ /";
const ROOTFS_FROM_CONTEXT: &str = "COPY rootfs/ /";

/// What the host needs: the container tools (podman runs containers with runc here),
/// musl-gcc for the C parts of the dependencies (mimalloc, ring), the CA bundle.
const IMAGE_PACKAGES: &[&str] = &["podman", "buildah", "runc", "musl-tools", "ca-certificates"];

const USAGE: &str = "\
usage: cargo xtask image [build|check|rootfs DIR]
  build       (default) the image, tagged as deploy/daemonset.yaml names it, and its
              oci-archive target/image/ward-VERSION.oci.tar (root)
  check       build, load the archive into a private podman store, inspect and run it:
              labels, files, `ward --version`, the agent as the DaemonSet runs it (root)
  rootfs DIR  only the image's files, into DIR (deploy/Dockerfile's build stage)";

pub fn image(args: &[String]) -> Result {
    match args.first().map(String::as_str) {
        None | Some("build") => build().map(|image| image.report()),
        Some("check") => check().map(drop),
        Some("rootfs") => match args.get(1) {
            Some(dir) => rootfs(Path::new(dir)).map(|version| {
                eprintln!("ward {version}: the image's files are in {dir}");
            }),
            None => Err(USAGE.into()),
        },
        Some(_) => Err(USAGE.into()),
    }
}

/// A built image.
#[derive(Debug, Clone)]
pub struct Image {
    /// Its name, as deploy/daemonset.yaml gives it (`ghcr.io/example/ward:0.1.0`).
    pub reference: String,
    /// `ward --version` of its binary.
    pub version: String,
    /// The commit it was built from (`-dirty` with uncommitted changes).
    pub revision: String,
    /// Its image (config) id in the local store.
    pub id: String,
    /// The oci-archive: `podman load -i`, `kind load image-archive`, `ctr images import`.
    pub archive: PathBuf,
    /// Its one layer's size, unpacked.
    pub unpacked_bytes: u64,
    /// How long `build` took (the eBPF object, ward, the image, the archive).
    pub build_time: std::time::Duration,
}

impl Image {
    fn report(&self) {
        let archive = fs::metadata(&self.archive).map(|m| m.len()).unwrap_or(0);
        eprintln!(
            "image {} (id {}), ward {} from {}, built in {:.0} s\n\
             archive {}: {} (gzip layer; {} unpacked)\n\
             load it with `podman load -i ARCHIVE`, `kind load image-archive ARCHIVE` or \
             `ctr -n k8s.io images import ARCHIVE`",
            self.reference,
            &self.id[..12.min(self.id.len())],
            self.version,
            self.revision,
            self.build_time.as_secs_f64(),
            self.archive.display(),
            megabytes(archive),
            megabytes(self.unpacked_bytes),
        );
    }
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// Builds the image and its archive.
pub fn build() -> Result<Image> {
    let started = std::time::Instant::now();
    crate::require_root("image")?;
    ensure_debs(IMAGE_PACKAGES)?;
    let spec = container::AgentSpec::from_daemonset(container::DAEMONSET)?;
    let reference = spec.image;
    let dir = root().join("target/image");
    let context = dir.join("context");
    let version = rootfs(&context.join("rootfs"))?;
    let tag = reference.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
    if tag != version {
        return Err(format!(
            "deploy/daemonset.yaml names the image {reference}, but ward is version {version}: \
             the tag is the version (change one of them)"
        ));
    }
    let containerfile = context.join("Containerfile");
    write(
        &containerfile,
        &image_stage(&read(&root().join("deploy/Dockerfile"))?)?,
    )?;
    // The image this build replaces under the same name, removed once it has no name.
    let replaced = image_id(&reference).ok();
    let revision = git_revision()?;
    // The commit's time for every timestamp in the image: the same sources, the same image.
    let time = git(&["log", "-1", "--format=%ct"])?;
    run(Command::new("buildah")
        .args([
            "build",
            "--quiet",
            "--format",
            "oci",
            "--identity-label=false",
        ])
        .args(["--timestamp", &time])
        .arg("--build-arg")
        .arg(format!("VERSION={version}"))
        .arg("--build-arg")
        .arg(format!("REVISION={revision}"))
        .arg("--file")
        .arg(&containerfile)
        .args(["--tag", &reference])
        .arg(&context))?;
    let archive = dir.join(format!("ward-{version}.oci.tar"));
    remove_file(&archive)?;
    // buildah push compresses the layer (gzip); the archive's index names the image in
    // full, which is what `podman load` and `ctr images import` tag it with.
    run(Command::new("buildah")
        .args(["push", "--quiet", &reference])
        .arg(format!("oci-archive:{}:{reference}", archive.display())))?;
    let id = image_id(&reference)?;
    if let Some(old) = replaced.filter(|old| *old != id) {
        // still in use by a container, or tagged elsewhere: then it stays
        let _ = Command::new("podman").args(["rmi", &old]).output();
    }
    Ok(Image {
        reference,
        version,
        revision,
        id,
        archive,
        unpacked_bytes: tree_bytes(&context.join("rootfs"))?,
        build_time: started.elapsed(),
    })
}

/// The id of the image named `reference` in the machine's store.
fn image_id(reference: &str) -> Result<String> {
    output(Command::new("podman").args(["image", "inspect", "--format", "{{.Id}}", reference]))
}

/// Makes the image's files in `dir` (afresh): the static `ward` of the dist profile with
/// the eBPF object embedded, and the build host's CA bundle. Returns ward's version.
pub fn rootfs(dir: &Path) -> Result<String> {
    ensure_debs(&["musl-tools", "ca-certificates"])?;
    ensure_target(MUSL)?;
    build_ebpf()?;
    // redirect-bpf embeds an empty object when there is none (so that the workspace
    // builds without nightly); an image must never ship that.
    let object = root().join(crate::BPF_OBJECT);
    if fs::metadata(&object).map(|m| m.len()).unwrap_or(0) == 0 {
        return Err(format!(
            "{}: no eBPF object after `cargo xtask build-ebpf`",
            object.display()
        ));
    }
    run(cargo()
        .args(["build", "--profile", "dist", "--target", MUSL])
        .args(["-p", "agent", "--bin", "ward"]))?;
    let binary = root().join("target").join(MUSL).join("dist/ward");
    let version = output(Command::new(&binary).arg("--version"))?;
    let version = version
        .strip_prefix("ward ")
        .ok_or_else(|| format!("{}: --version says {version:?}", binary.display()))?
        .to_string();
    if dir.exists() {
        fs::remove_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    install(&binary, &dir.join(WARD), 0o755)?;
    install(&Path::new("/").join(CA_BUNDLE), &dir.join(CA_BUNDLE), 0o644)?;
    open_directories(dir)?;
    Ok(version)
}

/// Copies `from` to `to` with `mode`, making the directories on the way.
fn install(from: &Path, to: &Path, mode: u32) -> Result {
    let parent = to.parent().ok_or("no parent directory")?;
    fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    fs::copy(from, to).map_err(|e| format!("{} -> {}: {e}", from.display(), to.display()))?;
    set_mode(to, mode)
}

/// Every directory under `dir` (and `dir`) 0755, whatever the umask was: users other
/// than root read the image.
fn open_directories(dir: &Path) -> Result {
    set_mode(dir, 0o755)?;
    for e in fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let p = e.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        if p.is_dir() {
            open_directories(&p)?;
        }
    }
    Ok(())
}

fn set_mode(p: &Path, mode: u32) -> Result {
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .map_err(|e| format!("{}: {e}", p.display()))
}

/// The bytes of the files under `dir`.
fn tree_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for e in fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let e = e.map_err(|e| format!("{}: {e}", dir.display()))?;
        let meta = e.metadata().map_err(|e| format!("{}: {e}", e))?;
        total += if meta.is_dir() {
            tree_bytes(&e.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

/// deploy/Dockerfile's last stage, the image, as xtask builds it: the rootfs that the
/// build stage makes comes from the build context instead. Anything else in that stage
/// that would need the build stage (another COPY, ADD, RUN) is an error, since xtask's
/// image would then differ from Docker's.
pub fn image_stage(dockerfile: &str) -> Result<String> {
    let lines: Vec<&str> = dockerfile.lines().collect();
    let keyword = |l: &str| {
        l.split_whitespace()
            .next()
            .map(str::to_ascii_uppercase)
            .unwrap_or_default()
    };
    let start = lines
        .iter()
        .rposition(|l| keyword(l) == "FROM")
        .ok_or("deploy/Dockerfile: no FROM")?;
    if lines[start].trim() != "FROM scratch" {
        return Err(format!(
            "deploy/Dockerfile line {}: the image stage must be `FROM scratch`, not {:?}",
            start + 1,
            lines[start].trim()
        ));
    }
    let mut out = String::new();
    let mut copies = 0;
    for (i, line) in lines.iter().enumerate().skip(start) {
        if line.trim() == ROOTFS_FROM_BUILD {
            copies += 1;
            out.push_str(ROOTFS_FROM_CONTEXT);
        } else if matches!(keyword(line).as_str(), "COPY" | "ADD" | "RUN") {
            return Err(format!(
                "deploy/Dockerfile line {}: {:?}: the image stage takes only `{ROOTFS_FROM_BUILD}` \
                 (put files into the rootfs that `cargo xtask image rootfs` makes)",
                i + 1,
                line.trim()
            ));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    if copies != 1 {
        return Err(format!(
            "deploy/Dockerfile: the image stage must copy the rootfs once with `{ROOTFS_FROM_BUILD}`"
        ));
    }
    Ok(out)
}

/// `rustup target add` when the toolchain lacks `target`.
fn ensure_target(target: &str) -> Result {
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if !installed.lines().any(|l| l.trim() == target) {
        run(Command::new("rustup").args(["target", "add", target]))?;
    }
    Ok(())
}

/// `git rev-parse HEAD`, with `-dirty` when tracked files differ from it.
fn git_revision() -> Result<String> {
    let head = git(&["rev-parse", "HEAD"])?;
    let dirty = !git(&["status", "--porcelain", "--untracked-files=no"])?.is_empty();
    Ok(if dirty { format!("{head}-dirty") } else { head })
}

fn git(args: &[&str]) -> Result<String> {
    output(Command::new("git").args(args).current_dir(root()))
}

/// The trimmed stdout of a command that must succeed.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn read(p: &Path) -> Result<String> {
    fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))
}

fn write(p: &Path, text: &str) -> Result {
    fs::write(p, text).map_err(|e| format!("{}: {e}", p.display()))
}

fn remove_file(p: &Path) -> Result {
    match fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(format!("{}: {e}", p.display())),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn dockerfile() -> String {
        read(&root().join("deploy/Dockerfile")).unwrap()
    }

    #[test]
    fn the_dockerfile_builds_its_rootfs_with_the_xtask_step() {
        let d = dockerfile();
        assert!(
            d.lines()
                .any(|l| l.trim() == "RUN cargo xtask image rootfs /rootfs"),
            "deploy/Dockerfile's build stage must make /rootfs with `cargo xtask image rootfs`"
        );
    }

    #[test]
    fn the_image_stage_is_the_dockerfiles_last_stage_with_the_rootfs_from_the_context() {
        let stage = image_stage(&dockerfile()).unwrap();
        assert!(stage.starts_with("FROM scratch\n"), "{stage}");
        assert!(stage.contains("\nCOPY rootfs/ /\n"), "{stage}");
        assert!(!stage.contains("--from"), "{stage}");
        for want in [
            "org.opencontainers.image.version=\"${VERSION}\"",
            "org.opencontainers.image.revision=\"${REVISION}\"",
            "ENTRYPOINT [\"/usr/bin/ward\"]",
            "USER 65532:65532",
        ] {
            assert!(stage.contains(want), "no {want} in\n{stage}");
        }
    }

    #[test]
    fn an_image_stage_that_needs_more_than_the_rootfs_is_refused() {
        let base = "FROM rust AS build\nRUN make\nFROM scratch\n";
        let extra = format!("{base}{ROOTFS_FROM_BUILD}\nCOPY --from=build /etc/passwd /etc/\n");
        assert!(image_stage(&extra).unwrap_err().contains("line 5"));
        let run = format!("{base}{ROOTFS_FROM_BUILD}\nRUN true\n");
        assert!(image_stage(&run).unwrap_err().contains("RUN true"));
        assert!(image_stage(base).unwrap_err().contains("once"));
        let debian = format!("FROM debian\n{ROOTFS_FROM_BUILD}\n");
        assert!(image_stage(&debian).unwrap_err().contains("FROM scratch"));
    }
}
