package coexist

import (
	"fmt"

	"github.com/google/nftables"
)

// kubeProxyTable is the table kube-proxy's nftables mode owns, in the ip
// and ip6 families (pkg/proxy/nftables CleanupLeftovers deletes both).
const kubeProxyTable = "kube-proxy"

var nftFamilies = []struct {
	family nftables.TableFamily
	name   string
}{{nftables.TableFamilyIPv4, "ip"}, {nftables.TableFamilyIPv6, "ip6"}}

// kubeProxyTables lists kube-proxy's nftables tables in this netns, as
// "ip kube-proxy".
func kubeProxyTables(conn *nftables.Conn) ([]*nftables.Table, []string, error) {
	var tables []*nftables.Table
	var names []string
	for _, f := range nftFamilies {
		ts, err := conn.ListTablesOfFamily(f.family)
		if err != nil {
			return nil, nil, fmt.Errorf("list nftables %s tables: %w", f.name, err)
		}
		for _, t := range ts {
			if t.Name == kubeProxyTable {
				tables = append(tables, t)
				names = append(names, "table "+f.name+" "+t.Name)
			}
		}
	}
	return tables, names, nil
}

func findNFTables() ([]Finding, error) {
	conn, err := nftables.New()
	if err != nil {
		return nil, err
	}
	_, names, err := kubeProxyTables(conn)
	var found []Finding
	for _, n := range names {
		found = append(found, Finding{What: "kube-proxy nftables rules", Where: "nftables " + n})
	}
	return found, err
}

// removeNFTables deletes kube-proxy's tables in one transaction, as
// kube-proxy --cleanup does, and names them.
func removeNFTables() ([]string, error) {
	conn, err := nftables.New()
	if err != nil {
		return nil, err
	}
	tables, names, err := kubeProxyTables(conn)
	if err != nil || len(tables) == 0 {
		return nil, err
	}
	for _, t := range tables {
		conn.DelTable(t)
	}
	if err := conn.Flush(); err != nil {
		return nil, fmt.Errorf("delete nftables kube-proxy tables: %w", err)
	}
	var done []string
	for _, n := range names {
		done = append(done, "nftables: deleted "+n)
	}
	return done, nil
}
