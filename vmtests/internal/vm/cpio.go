package vm

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path"
	"syscall"
)

// cpioWriter writes the "newc" archive format the kernel unpacks as
// initramfs; written in Go so no cpio tool or root (for /dev nodes) is needed.
type cpioWriter struct {
	w    *bufio.Writer
	ino  uint32
	dirs map[string]bool
}

func newCPIO(w io.Writer) *cpioWriter {
	return &cpioWriter{w: bufio.NewWriterSize(w, 1<<20), dirs: map[string]bool{"": true, ".": true, "/": true}}
}

func (c *cpioWriter) header(name string, mode uint32, size int64, rmajor, rminor uint32) error {
	if err := c.parents(name); err != nil {
		return err
	}
	c.ino++
	// newc: magic, then 13 eight-digit hex fields, then the NUL-terminated name.
	_, err := fmt.Fprintf(c.w, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%s\x00",
		c.ino, mode, 0, 0, 1, 0, size, 0, 0, rmajor, rminor, len(name)+1, 0, name)
	if err != nil {
		return err
	}
	return c.pad(110 + int64(len(name)) + 1)
}

func (c *cpioWriter) pad(n int64) error {
	_, err := c.w.Write(make([]byte, (4-n%4)%4))
	return err
}

// parents creates missing parent directories of name.
func (c *cpioWriter) parents(name string) error {
	dir := path.Dir(name)
	if c.dirs[dir] {
		return nil
	}
	return c.Dir(dir)
}

func (c *cpioWriter) Dir(name string) error {
	if c.dirs[name] {
		return nil
	}
	if err := c.header(name, syscall.S_IFDIR|0o755, 0, 0, 0); err != nil {
		return err
	}
	c.dirs[name] = true
	return nil
}

func (c *cpioWriter) File(name string, mode uint32, data []byte) error {
	if err := c.header(name, syscall.S_IFREG|mode, int64(len(data)), 0, 0); err != nil {
		return err
	}
	if _, err := c.w.Write(data); err != nil {
		return err
	}
	return c.pad(int64(len(data)))
}

// CopyFile streams a host file into the archive.
func (c *cpioWriter) CopyFile(name string, mode uint32, src string) error {
	f, err := os.Open(src)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	if err := c.header(name, syscall.S_IFREG|mode, st.Size(), 0, 0); err != nil {
		return err
	}
	if _, err := io.Copy(c.w, f); err != nil {
		return err
	}
	return c.pad(st.Size())
}

func (c *cpioWriter) Symlink(name, target string) error {
	if err := c.header(name, syscall.S_IFLNK|0o777, int64(len(target)), 0, 0); err != nil {
		return err
	}
	if _, err := c.w.WriteString(target); err != nil {
		return err
	}
	return c.pad(int64(len(target)))
}

func (c *cpioWriter) CharDev(name string, major, minor uint32) error {
	return c.header(name, syscall.S_IFCHR|0o600, 0, major, minor)
}

// Close writes the trailer and flushes.
func (c *cpioWriter) Close() error {
	if err := c.header("TRAILER!!!", 0, 0, 0, 0); err != nil {
		return err
	}
	return c.w.Flush()
}
