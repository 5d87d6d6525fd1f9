"""Fixtures for tests on libvirt's test driver (``test:///default``).

The test driver is shared by every connection in this process, so each test defines its own
domains under a unique prefix and removes them afterwards.
"""

import itertools
import uuid as uuidlib

import libvirt
import pytest

TEST_URI = "test:///default"
_counter = itertools.count()

DOMAIN_XML = """<domain type='test'>
  <name>{name}</name><uuid>{uuid}</uuid><memory>65536</memory><vcpu>1</vcpu>
  <os><type>hvm</type></os>
</domain>"""


class TestDriver:
    """Defines domains on the shared test driver and cleans them up."""

    def __init__(self):
        self.conn = libvirt.open(TEST_URI)
        self.prefix = f"t{next(_counter)}-"
        self.domains = []

    def define(self, name, start=True):
        dom = self.conn.defineXML(DOMAIN_XML.format(name=self.prefix + name, uuid=uuidlib.uuid4()))
        self.domains.append(dom)
        if start:
            dom.create()
        return dom

    def close(self):
        for dom in self.domains:
            try:
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
            except libvirt.libvirtError:
                pass
        self.conn.close()


@pytest.fixture
def testdriver():
    driver = TestDriver()
    yield driver
    driver.close()
