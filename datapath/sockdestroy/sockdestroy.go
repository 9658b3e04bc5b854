// Package sockdestroy closes the sockets that socket-level load balancing
// connected to backends since removed, so clients reconnect to live ones.
//
// A BPF socket iterator only walks the network namespace it is opened in
// and pods live in namespaces of their own, so every namespace of every
// process in the attached cgroups is visited, once each.
package sockdestroy

import (
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netns"

	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/datapath/metrics"
	"github.com/servicepath/servicepath/datapath/nsexec"
	"github.com/servicepath/servicepath/datapath/service"
)

// Report says what one run did.
type Report struct {
	Destroyed  uint64
	Namespaces int
	// Unreachable lists namespaces that held processes of the cgroups but
	// could not be entered, with why.
	Unreachable []string
}

// Run destroys the sockets the socket hooks connected from each removed
// backend's frontend to that backend, in every netns of the processes of
// cgroups (and their descendants).
func Run(d *loader.SockDestroyer, m *maps.Maps, cgroups []string, removed []service.Removed) (Report, error) {
	var rep Report
	if len(removed) == 0 || len(cgroups) == 0 {
		return rep, nil
	}
	keys := make([]maps.SockDestroyKey, 0, len(removed))
	for _, r := range removed {
		b, fam := maps.AddrFrom(r.Backend.Addr())
		vip, _ := maps.AddrFrom(r.Frontend.Addr)
		keys = append(keys, maps.SockDestroyKey{Backend: b, VIP: vip, BackendPort: maps.NewBE16(r.Backend.Port()),
			VIPPort: maps.NewBE16(r.Frontend.Port), Proto: uint8(r.Frontend.Protocol), Family: fam})
	}
	for _, k := range keys {
		if err := d.Targets.Put(k, uint8(1)); err != nil {
			return rep, fmt.Errorf("stage sockets to destroy: %w", err)
		}
	}
	defer func() {
		for _, k := range keys {
			d.Targets.Delete(k)
		}
	}()

	spaces, err := namespaces(cgroups)
	if err != nil {
		return rep, err
	}
	var iters []*link.Iter
	for _, p := range []*ebpf.Program{d.TCP, d.UDP} {
		it, err := link.AttachIter(link.IterOptions{Program: p})
		if err != nil {
			return rep, fmt.Errorf("create socket iterator %s: %w", p, err)
		}
		defer it.Close()
		iters = append(iters, it)
	}

	before, err := destroyed(m)
	if err != nil {
		return rep, err
	}
	for _, ns := range spaces {
		if err := ns.visit(iters); err != nil {
			rep.Unreachable = append(rep.Unreachable, err.Error())
			continue
		}
		rep.Namespaces++
	}
	after, err := destroyed(m)
	if err != nil {
		return rep, err
	}
	rep.Destroyed = after - before
	return rep, nil
}

func destroyed(m *maps.Maps) (uint64, error) {
	c, err := metrics.Read(m.Metrics)
	if err != nil {
		return 0, err
	}
	return c["sock_destroyed"], nil
}

// space is one network namespace and the processes that live in it.
type space struct {
	pids []int
}

// visit enters the namespace through the first of its processes still
// alive and runs each iterator to the end there: opening an iterator binds
// it to the opener's netns, reading it runs the program over every socket.
func (s space) visit(iters []*link.Iter) error {
	var lastErr error
	for _, pid := range s.pids {
		h, err := netns.GetFromPath(fmt.Sprintf("/proc/%d/ns/net", pid))
		if err != nil {
			lastErr = err
			continue
		}
		defer h.Close()
		return nsexec.Do(h, func() error {
			for _, it := range iters {
				r, err := it.Open()
				if err != nil {
					return fmt.Errorf("open socket iterator in netns of pid %d: %w", pid, err)
				}
				_, err = io.Copy(io.Discard, r)
				r.Close()
				if err != nil {
					return fmt.Errorf("run socket iterator in netns of pid %d: %w", pid, err)
				}
			}
			return nil
		})
	}
	return fmt.Errorf("netns of pids %v: %w", s.pids, lastErr)
}

// namespaces finds the distinct network namespaces of the processes in the
// cgroups, keyed by the namespace file's device and inode.
func namespaces(cgroups []string) ([]space, error) {
	type id struct{ dev, ino uint64 }
	byID := map[id]*space{}
	var order []id
	for _, cg := range cgroups {
		err := filepath.WalkDir(cg, func(path string, d fs.DirEntry, err error) error {
			if err != nil || !d.IsDir() {
				return nil // cgroups come and go while we walk
			}
			b, err := os.ReadFile(filepath.Join(path, "cgroup.procs"))
			if err != nil {
				return nil
			}
			for _, f := range strings.Fields(string(b)) {
				pid, err := strconv.Atoi(f)
				if err != nil {
					continue
				}
				var st syscall.Stat_t
				if syscall.Stat(fmt.Sprintf("/proc/%d/ns/net", pid), &st) != nil {
					continue // exited
				}
				k := id{st.Dev, st.Ino}
				if byID[k] == nil {
					byID[k] = &space{}
					order = append(order, k)
				}
				byID[k].pids = append(byID[k].pids, pid)
			}
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("walk cgroup %s: %w", cg, err)
		}
	}
	out := make([]space, 0, len(order))
	for _, k := range order {
		out = append(out, *byID[k])
	}
	return out, nil
}
