package debian

import (
	"os"
	"reflect"
	"testing"
)

func TestCompareVersions(t *testing.T) {
	for _, c := range []struct {
		a, b string
		want int
	}{
		{"6.12.117-1", "6.12.117-1~deb12u1", 1},
		{"6.1.192-2", "6.1.192-1", 1},
		{"6.1.180-1~deb11u1", "6.1.192-1", -1},
		{"6.12.9-1", "6.12.117-1", -1},
		{"1:1.0-1", "2.0-1", 1},
		{"1.0a-1", "1.0-1", 1},
		{"1.0+b1", "1.0", 1},
		{"7.2.13-1", "7.2.13-1", 0},
	} {
		if got := CompareVersions(c.a, c.b); got != c.want {
			t.Errorf("CompareVersions(%q, %q) = %d, want %d", c.a, c.b, got, c.want)
		}
	}
	if got := Upstream("1:6.1.192-2"); got != "6.1.192" {
		t.Errorf("Upstream of 1:6.1.192-2 is %q, want 6.1.192", got)
	}
}

func TestHostArchive(t *testing.T) {
	got, err := HostArchive("testdata/etc/apt", "testdata/os-release")
	if err != nil {
		t.Fatal(err)
	}
	want := Archive{
		Codename: "bookworm",
		Main:     "http://mirror.example.org/debian",
		Security: "http://security.example.org/debian-security",
		SignedBy: "/etc/apt/keyrings/mirror.gpg",
	}
	if got != want {
		t.Errorf("archive from the first deb entry of the host's release:\n got %+v\nwant %+v", got, want)
	}
}

func TestImageNames(t *testing.T) {
	got := ImageNames("linux-image-cloud-amd64\nlinux-image-6.1.0-56-cloud-amd64\nlinux-image-6.1.0-56-cloud-amd64-dbg\n" +
		"linux-image-6.1.0-56-amd64\nlinux-image-7.2.13+deb14-cloud-amd64\n")
	want := []string{"linux-image-6.1.0-56-cloud-amd64", "linux-image-7.2.13+deb14-cloud-amd64"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("cloud images with a version: got %v, want %v", got, want)
	}
}

func TestSelect(t *testing.T) {
	show, err := os.ReadFile("testdata/apt-cache-show.txt")
	if err != nil {
		t.Fatal(err)
	}
	got, err := Select([]string{"5.10", "6.1", "6.12", "7"}, ParseStanzas(string(show)))
	if err != nil {
		t.Fatal(err)
	}
	want := []Selection{
		{"5.10", "5.10.262", "5.10.0-46-cloud-amd64", []Package{{"linux-image-5.10.0-46-cloud-amd64", "5.10.262-1"}}},
		// The ABI bump -56 wins over -55 of the same upstream; 6.1 built for bullseye is older.
		{"6.1", "6.1.192", "6.1.0-56-cloud-amd64", []Package{{"linux-image-6.1.0-56-cloud-amd64", "6.1.192-2"}}},
		// trixie's build beats the bookworm backport (~deb12u1) of the same upstream.
		{"6.12", "6.12.117", "6.12.117+deb13-cloud-amd64", []Package{{"linux-image-6.12.117+deb13-cloud-amd64", "6.12.117-1"}}},
		// sid's linux-image is a meta-package: its parts are fetched too.
		{"7", "7.2.13", "7.2.13+deb14-cloud-amd64", []Package{
			{"linux-image-7.2.13+deb14-cloud-amd64", "7.2.13-1"},
			{"linux-base-7.2.13+deb14-cloud-amd64", "7.2.13-1"},
			{"linux-binary-7.2.13+deb14-cloud-amd64", "7.2.13-1"},
			{"linux-modules-7.2.13+deb14-cloud-amd64", "7.2.13-1"},
		}},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("selection:\n got %+v\nwant %+v", got, want)
	}
	if _, err := Select([]string{"4.19"}, ParseStanzas(string(show))); err == nil {
		t.Error("a series with no image should be an error")
	}
}
