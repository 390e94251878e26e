//! Per-core buffer pool: two size classes of buffers and empty splice pipes, bounded free
//! lists, no locks (`!Send`).

use std::cell::RefCell;
use std::rc::Rc;

struct Inner {
    small_size: usize,
    large_size: usize,
    keep: usize,
    small: Vec<Vec<u8>>,
    large: Vec<Vec<u8>>,
    /// Empty pipes for splice mode (creating and sizing two pipes per connection costs more
    /// than the rest of a short connection's setup).
    pipes: Vec<crate::sys::Pipe>,
}

/// Cheap to clone; lives on one worker.
#[derive(Clone)]
pub struct BufPool(Rc<RefCell<Inner>>);

impl BufPool {
    /// `small` is the first buffer a connection gets, `large` the one it grows to; up to
    /// `keep` free buffers of each class are kept for reuse.
    pub fn new(small: usize, large: usize, keep: usize) -> Self {
        BufPool(Rc::new(RefCell::new(Inner {
            small_size: small,
            large_size: large.max(small),
            keep,
            small: Vec::new(),
            large: Vec::new(),
            pipes: Vec::new(),
        })))
    }

    pub fn small_size(&self) -> usize {
        self.0.borrow().small_size
    }

    pub fn large_size(&self) -> usize {
        self.0.borrow().large_size
    }

    /// An empty buffer with capacity of the small (or large) class.
    pub fn get(&self, large: bool) -> Vec<u8> {
        let mut p = self.0.borrow_mut();
        let size = if large { p.large_size } else { p.small_size };
        let list = if large { &mut p.large } else { &mut p.small };
        list.pop().unwrap_or_else(|| Vec::with_capacity(size))
    }

    /// Return a buffer; it is dropped if the list is full or it is of a foreign size.
    pub fn put(&self, mut buf: Vec<u8>) {
        let mut p = self.0.borrow_mut();
        buf.clear();
        let keep = p.keep;
        let list = if buf.capacity() == p.large_size {
            &mut p.large
        } else if buf.capacity() == p.small_size {
            &mut p.small
        } else {
            return;
        };
        if list.len() < keep {
            list.push(buf);
        }
    }

    /// An empty pipe of at least `size` bytes: a pooled one, or a new one.
    pub fn get_pipe(&self, size: usize) -> std::io::Result<crate::sys::Pipe> {
        let pooled = self.0.borrow_mut().pipes.pop();
        match pooled {
            Some(p) if p.requested == size => Ok(p),
            _ => crate::sys::Pipe::new(size),
        }
    }

    /// Return a pipe; kept only if it is empty (a connection that ended in a reset may leave
    /// bytes in it) and the list is not full.
    pub fn put_pipe(&self, pipe: crate::sys::Pipe) {
        if !matches!(crate::sys::pipe_pending(&pipe), Ok(0)) {
            return;
        }
        let mut p = self.0.borrow_mut();
        if p.pipes.len() < p.keep {
            p.pipes.push(pipe);
        }
    }

    /// Free buffers held now (small, large).
    pub fn idle(&self) -> (usize, usize) {
        let p = self.0.borrow();
        (p.small.len(), p.large.len())
    }

    /// Empty pipes held now.
    pub fn idle_pipes(&self) -> usize {
        self.0.borrow().pipes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuse_and_bounds() {
        let p = BufPool::new(8, 32, 1);
        let a = p.get(false);
        assert_eq!(a.capacity(), 8);
        let ptr = a.as_ptr();
        p.put(a);
        let b = p.get(false);
        assert_eq!(b.as_ptr(), ptr, "buffer reused");
        p.put(b);
        p.put(Vec::with_capacity(8)); // over `keep`: dropped
        assert_eq!(p.idle(), (1, 0));
        p.put(Vec::with_capacity(5)); // foreign size: dropped
        assert_eq!(p.idle(), (1, 0));
        assert_eq!(p.get(true).capacity(), 32);
    }

    #[test]
    fn only_empty_pipes_are_reused() {
        use std::os::fd::AsRawFd;
        let p = BufPool::new(8, 32, 2);
        let a = p.get_pipe(65536).unwrap();
        let fd = a.read.as_raw_fd();
        p.put_pipe(a);
        assert_eq!(p.idle_pipes(), 1);
        let b = p.get_pipe(65536).unwrap();
        assert_eq!(b.read.as_raw_fd(), fd, "the empty pipe is reused");
        // A pipe with bytes left in it is dropped, not pooled.
        let n = crate::sys::splice_nonblocking(
            std::fs::File::open("/dev/zero").unwrap().as_raw_fd(),
            b.write.as_raw_fd(),
            100,
        );
        assert_eq!(n.unwrap(), 100);
        p.put_pipe(b);
        assert_eq!(p.idle_pipes(), 0);
        // A different size is not handed out from the pool.
        p.put_pipe(p.get_pipe(65536).unwrap());
        assert_ne!(p.get_pipe(131072).unwrap().requested, 65536);
    }
}
