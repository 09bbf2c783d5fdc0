//! Opening a sync target so that a power cut at any instant leaves a rerun something it
//! can finish.
//!
//! - An existing block device is opened exclusively (unless forced): Linux refuses it
//!   with `EBUSY` while mounted or claimed, and the error names the mount point. It must
//!   hold the image ([`check_target_size`]).
//! - An existing regular file smaller than the image is grown to the image size, durably
//!   (a file is not a partition: its size is ours to set). It is not *fresh*: what it
//!   holds is scanned.
//! - A missing target is created under a temporary name `.NAME.tessera-new.RANDOM` beside
//!   it (`O_EXCL|O_NOFOLLOW`, a random suffix: never a planted file or link), sized,
//!   synced, renamed to NAME (never replacing anything) and the directory synced: only
//!   then does it exist, at its full size, durably, and the journal header may follow.
//!   A cut before the rename leaves a temporary file, which the next run deletes; a cut
//!   after leaves a full-size file, which the next run scans.
//!
//! Temporary names of a killed run are deleted whenever a file target is opened for
//! writing: only names of that exact shape, beside that target.
//!
//! A target named through a symbolic link is followed (`/dev/disk/by-partlabel/…`), unless
//! another user planted that link in a world-writable sticky directory (the rule of
//! `fs.protected_symlinks`, applied whatever that setting).

use std::path::Path;

use super::fs::{is_errno, is_io_kind, remove_temp_debris, split_path, temp_path, Fs, FsFile};
use super::io::{ReadAt, WriteAt};
use crate::device::{busy_error, check_target_size, DeviceKind};
use crate::error::{Error, Result};

/// A target open for writing.
#[derive(Debug)]
pub struct OpenTarget<F> {
    /// The file or block device.
    pub file: F,
    /// This call created it: it reads as zeros and need not be scanned.
    pub fresh: bool,
}

/// Opens (or creates) `path` to write an image of `image_size` bytes: see the module
/// documentation. `exclusive` opens a block device with `O_EXCL`.
///
/// # Errors
/// [`Error::InvalidInput`] for a block device too small, mounted or claimed (naming its
/// mount point), or a path with no file name; [`Error::Io`] naming the path.
pub fn open_target<F: Fs>(
    fs: &F,
    path: &Path,
    image_size: u64,
    exclusive: bool,
) -> Result<OpenTarget<F::File>> {
    refuse_planted_link(path)?;
    match fs.open_rw(path, exclusive) {
        Ok(file) => {
            if file.kind() == DeviceKind::File {
                remove_temp_debris(fs, path);
                if file.size() < image_size {
                    file.set_len(image_size)?;
                    file.sync_all()?;
                }
            }
            check_target_size(path.display(), file.kind(), file.size(), image_size)?;
            Ok(OpenTarget { file, fresh: false })
        }
        Err(e) if is_io_kind(&e, std::io::ErrorKind::NotFound) => {
            remove_temp_debris(fs, path);
            let file = create(fs, path, image_size)?;
            Ok(OpenTarget { file, fresh: true })
        }
        Err(e) if is_errno(&e, libc::EBUSY) => Err(busy_error(path)),
        Err(e) => Err(e),
    }
}

/// Refuses a target path that is a symbolic link another user planted in a shared
/// directory (world-writable and sticky, such as `/tmp`): the rule Linux applies itself
/// with `fs.protected_symlinks = 1`, checked here whatever that setting, so a planted link
/// never makes tessera write an image over the file it names. Links owned by this user or
/// by the directory's owner (`/dev/disk/by-*`, a slot link of one's own) are followed.
///
/// # Errors
/// [`Error::InvalidInput`] naming the link, its owner and the directory.
fn refuse_planted_link(path: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(link) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !link.file_type().is_symlink() {
        return Ok(());
    }
    let (dir, _) = split_path(path)?;
    let Ok(d) = std::fs::metadata(&dir) else {
        return Ok(());
    };
    let shared = d.mode() & 0o1002 == 0o1002;
    if shared && link.uid() != crate::sys::euid() && link.uid() != d.uid() {
        return Err(Error::InvalidInput(format!(
            "target {} is a symbolic link owned by uid {} in the shared directory {} \
             (world-writable, sticky): refusing to follow it (name the file it points to)",
            path.display(),
            link.uid(),
            dir.display()
        )));
    }
    Ok(())
}

/// Creates the target durably at its full size: temporary name, size, fsync, rename,
/// fsync of the directory.
fn create<F: Fs>(fs: &F, path: &Path, image_size: u64) -> Result<F::File> {
    let (dir, _) = split_path(path)?;
    let tmp = temp_path(path)?;
    let mut file = fs.create_new(&tmp, 0o666)?;
    let sized = file.set_len(image_size).and_then(|()| file.sync_all());
    let renamed = sized.and_then(|()| fs.rename_noreplace(&tmp, path));
    if let Err(e) = renamed {
        let _ = fs.remove_file(&tmp);
        if is_io_kind(&e, std::io::ErrorKind::AlreadyExists) {
            return Err(Error::InvalidInput(format!(
                "target {} exists after all (a dangling symbolic link, or a file created \
                 meanwhile); nothing was written",
                path.display()
            )));
        }
        return Err(e);
    }
    file.renamed(path);
    fs.sync_dir(&dir)?;
    Ok(file)
}
